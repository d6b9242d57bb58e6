"""The GPU/cluster path, checked on CPU ranks (issue 12): every launcher, collectives on the
communication device, and a non-finite loss that stops every rank without per-step host syncs.

Each test is a real training run (1 epoch of a tiny shard set, row exchange on: shuffled
routing) under the launcher it names; the ZeRO runs start under torchrun."""

import json
import os
import re

import pytest

from tests.helpers import (
    LAUNCHER_ENV,
    REPO,
    TINY_TRAINING,
    deepspeed_train,
    free_port,
    launch_training,
    tiny_synthetic,
    train_on_ranks,
)

STEP_LOSS = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+ .*?\bloss=(\S+)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    tiny_synthetic(root / "shards", train_per_fine=16)  # 128 images: 8 steps of 2 x 8 per epoch
    return root


def args(root, name, *extra):
    return [
        *TINY_TRAINING,
        "--set",
        f"data.shards={root / 'shards'}",
        "--set",
        f"output_dir={root / 'runs'}",
        "--set",
        f"name={name}",
        "--set",
        "data.routing=shuffled",
        "--set",
        "optim.epochs=1",
        "--set",
        "checkpoint.every_epochs=1",
        *extra,
    ]


def results(root, name):
    return json.loads((root / "runs" / name / "results.json").read_text())


def step_losses(proc) -> dict[tuple[int, int], str]:
    """(epoch, step) -> the logged loss (rank 0's log lines, 4 significant digits)."""
    return step_losses_text(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def deepspeed_run(root):
    """2 ranks under the deepspeed launcher, with tests/comm_check/sitecustomize.py declaring the
    communication device (gloo: the CPU) in every process."""
    env = {"FGDIST_COMM_DEVICE": "cpu", "PYTHONPATH": f"{REPO / 'tests' / 'comm_check'}{os.pathsep}{REPO}"}
    return deepspeed_train(root, *args(root, "deepspeed"), env=env)


def test_every_collective_runs_through_collectives_on_the_communication_device(root, deepspeed_run):
    output = deepspeed_run.stdout + deepspeed_run.stderr
    assert output.count("comm check: installed, device cpu") >= 2  # the check ran in both ranks
    assert "comm check:" not in output.replace("comm check: installed, device cpu", "")
    metrics = results(root, "deepspeed")["metrics"]
    assert results(root, "deepspeed")["world_size"] == 2
    assert {"fine_recall_at_1", "super_map_at_r", "super_top1"} <= set(metrics)  # evaluation ran
    assert len(step_losses(deepspeed_run)) == 8
    # The start line (fgdist/training/start_time.py) once, from rank 0; DeepSpeed's shm op neither built
    # nor loaded (fgdist/training/deepspeed_shm.py: DeepSpeed prints this line whenever it loads the op).
    assert len(re.findall(r"\[fgdist rank 0\] INFO: started in [\d.]+ s: imports", output)) == 1
    assert "deepspeed_shm_comm_op built successfully" not in output


def test_torchrun_trains_what_the_deepspeed_launcher_trains(root, deepspeed_run):
    proc = train_on_ranks(root, *args(root, "torchrun"))
    assert results(root, "torchrun")["world_size"] == 2
    assert step_losses(proc) == step_losses(deepspeed_run)  # the same 8 steps, the same losses


def test_a_plain_python_process_trains_on_one_rank(root):
    proc = launch_training(root, [], None, *args(root, "plain"), unset=LAUNCHER_ENV)
    assert results(root, "plain")["world_size"] == 1
    assert len(step_losses(proc)) == 16  # 128 images in batches of 8 on one rank


def test_a_non_finite_loss_stops_every_rank_by_the_next_logging_step(root):
    """Rank 1's loss turns NaN at global step 2; with log_every_steps=4 no rank reads its flag
    before step 4, and there every rank stops with the same error (none goes on alone into a
    collective), before logging or saving step 4."""
    proc = deepspeed_train(
        root,
        *args(root, "nan", "--set", "tracking.log_every_steps=4", "--set", "checkpoint.every_steps=4"),
        env={"FGDIST_NAN_AT": "1:2"},
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for rank in (0, 1):
        assert re.search(
            rf"NonFiniteLossError: rank {rank}: non-finite loss on rank\(s\) \[(0, )?1\], first at global step 2; "
            r"stopped at global step 4 ",
            output,
        ), output[-3000:]
    assert not step_losses(proc)  # step 4 was neither logged
    assert not (root / "runs" / "nan" / "checkpoints" / "latest").exists()  # nor saved


# -- ZeRO stages 1 and 2: the engine's optimizer state (and gradients) cut over ranks ----------
def zero(stage: int) -> list[str]:
    return ["--set", f'deepspeed={{"zero_optimization": {{"stage": {stage}}}}}']


def embeddings_of(source):
    """Embeddings of a fixed random batch by a model loaded as users load it (fgdist.load_model)."""
    import torch

    from fgdist import load_model

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return load_model(str(source))(images)


def close_losses(a: dict, b: dict, rel: float) -> bool:
    return a.keys() == b.keys() and all(abs(float(a[k]) - float(b[k])) <= rel * abs(float(b[k])) for k in a)


def full_losses(root, name) -> dict[int, float]:
    """Global step -> the rank-averaged loss at full precision (MLflow's; the log lines keep 4
    digits, too coarse for the bounds below)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return {m.step: m.value for m in client.get_metric_history(results(root, name)["mlflow_run_id"], "loss")}


def drift(ours: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """The relative loss difference at each step (the same steps in both)."""
    assert ours.keys() == reference.keys(), (ours, reference)
    return {s: abs(ours[s] - reference[s]) / abs(reference[s]) for s in reference}


# The relative loss difference from stage 0 allowed at each step, 10x what bench/zero_drift.py
# measured (bench/RESULTS.md, "ZeRO stages and thread counts: the drift is rounding"): stages 1
# and 2 give the first two losses to the bit, differ by one float32 ulp of the loss (5e-8) at
# step 3, and training amplifies that to 5e-7 at step 7 and 9e-6 at step 8; in float64 the
# difference stays at or under one float32 ulp of the loss (computed in float32) through step 8.
# A real difference (a missing gradient average, weight decay, another LR) changes the step-2
# loss by far more than 1e-6.
ZERO_DRIFT_BOUND = {1: 1e-6, 2: 1e-6, 3: 1e-6, 4: 1e-6, 5: 1e-6, 6: 1e-6, 7: 1e-5, 8: 1e-4}


@pytest.fixture(scope="module")
def zero_runs(root):
    """ZeRO stage 1 for 1 epoch and stage 2 for 2 epochs (also the uninterrupted run that the
    resume test compares with; its first epoch is the 1-epoch run's: no milestone in 2 epochs)."""
    for stage, epochs in ((1, 1), (2, 2)):  # torchrun: the launcher is the module's first tests' subject
        train_on_ranks(root, *args(root, f"zero{stage}", *zero(stage), "--set", f"optim.epochs={epochs}"))


def first_epoch(losses: dict[int, float]) -> dict[int, float]:
    return {step: loss for step, loss in losses.items() if step <= 8}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_1_and_2_train_what_stage_0_trains(root, deepspeed_run, zero_runs, stage, monkeypatch):
    """The same losses as stage 0, to rounding (ZERO_DRIFT_BOUND)."""
    differences = drift(first_epoch(full_losses(root, f"zero{stage}")), full_losses(root, "deepspeed"))
    assert all(differences[s] <= ZERO_DRIFT_BOUND[s] for s in differences), differences
    assert results(root, f"zero{stage}")["metrics"]["eval_images"] == 16  # evaluation ran on the engine's module
    # The checkpoint file (mp_rank_00_model_states.pt, read by pictures and export) holds the
    # weights the trainer exported to MLflow from the engine's module at the end.
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    run = root / "runs" / f"zero{stage}"
    exported = embeddings_of(results(root, f"zero{stage}")["mlflow_run_id"])
    torch.testing.assert_close(embeddings_of(run), exported, atol=1e-6, rtol=0)


def test_zero_stage_2_resumes_where_it_stopped(root, zero_runs):
    train_on_ranks(root, *args(root, "zero2_stopped", *zero(2)))
    resumed = train_on_ranks(root, *args(root, "zero2_stopped", *zero(2), "--set", "optim.epochs=2", "--resume"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    second_epoch = {k: v for k, v in full_losses(root, "zero2").items() if k > 8}
    resumed_second_epoch = {k: v for k, v in full_losses(root, "zero2_stopped").items() if k > 8}
    assert len(second_epoch) == 8 and close_losses(resumed_second_epoch, second_epoch, rel=2e-3)


# -- two nodes on this machine: torchrun --nnodes 2, one rank each ---------------------------
# Each one-process node uses all of the machine's cores (LOCAL_WORLD_SIZE=1) where the single
# node gives each rank half: other thread counts, other float32 rounding. bench/zero_drift.py
# (its "threads x2" runs, bench/RESULTS.md) measured the difference from the single node: under
# 1.5e-7 over steps 1-3, then 1.2e-4 at step 4 growing to 6.6e-3 at step 8; in float64 it stays at
# or under one float32 ulp of the loss through step 11, so the growth is rounding amplified by
# training at lr 0.1. Bounds: 1e-6 over steps 1-3 (the first is the same fixed batch from the same
# weights), about 10x the measured value at step 4 and 1% after it (the real two-node runs
# measured up to 0.3%).
TWO_NODE_DRIFT_BOUND = {1: 1e-6, 2: 1e-6, 3: 1e-6, 4: 1e-3, 5: 1e-2, 6: 1e-2, 7: 1e-2, 8: 1e-2}


def two_nodes(root, *train_args):
    """Start both nodes (node_rank 0 and 1, one process each) and wait for both."""
    import subprocess

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    nodes = [
        subprocess.Popen(
            [
                "torchrun",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(REPO / "launcher" / "train.py"),
                *train_args,
            ],
            cwd=root,
            env={k: v for k, v in env.items() if k not in LAUNCHER_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    return outputs


def test_two_nodes_train_what_one_node_trains_and_resume(root, deepspeed_run):
    import mlflow

    first = two_nodes(root, *args(root, "two_nodes"))
    assert results(root, "two_nodes")["world_size"] == 2
    # Global rank 0 (node 0) logs and tracks; node 1's process is local rank 0 but global rank 1.
    assert "[fgdist rank 0] INFO: epoch 1/1 step 8/8" in first[0] and "INFO: epoch" not in first[1]
    # The single-node 2-rank losses, to rounding (TWO_NODE_DRIFT_BOUND).
    differences = drift(full_losses(root, "two_nodes"), full_losses(root, "deepspeed"))
    assert all(differences[s] <= TWO_NODE_DRIFT_BOUND[s] for s in differences), differences
    resumed = two_nodes(root, *args(root, "two_nodes", "--set", "optim.epochs=2", "--resume"))
    assert "resumed from" in resumed[0] and "epoch 2/2 step 8/8" in resumed[0]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'two_nodes'"
    )
    assert [r.info.run_id for r in runs] == [results(root, "two_nodes")["mlflow_run_id"]]  # one run, resumed


def step_losses_text(text: str) -> dict[tuple[int, int], str]:
    return {(int(e), int(s)): loss for e, s, loss in STEP_LOSS.findall(text)}
