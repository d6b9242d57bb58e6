"""Tracking against a real `mlflow server` (SQLite backend, proxied artifacts), with training
through the real DeepSpeed launcher on 2 CPU ranks:
- a run reads back from the server: params, metrics and their history, artifacts with pictures;
- the server goes away mid-run: training finishes (exit 0), warns exactly once, writes results.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.helpers import TINY_TRAINING, free_port, launcher_prefix, tiny_synthetic

REPO = Path(__file__).resolve().parents[2]
WARNING = "[fgdist rank 0] WARNING: MLflow at"  # fgdist.log's format


class Server:
    """`mlflow server` in its own process group (it forks workers); killed as a group."""

    def __init__(self, root: Path):
        self.root, self.proc = root, None

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / f"server-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root}/db.sqlite",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(
            f"mlflow server at {self.url} not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if not self.alive():
            self.start()
        self.wait_healthy()

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


def build_shards(out: Path, train_per_fine: int) -> Path:
    return Path(tiny_synthetic(out, train_per_fine=train_per_fine))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One server for the module (it takes ~30 s to start on 2 cores); the shards are built while
    it starts. The last test kills it; `ensure_running` restarts it for any test run after that."""
    root = tmp_path_factory.mktemp("mlflow_server")
    server = Server(root)
    server.start()
    try:
        shards = {"small": build_shards(root / "shards_small", 4), "longer": build_shards(root / "shards_longer", 16)}
        server.wait_healthy()
        yield root, server, shards
    finally:
        server.kill()


def launch(
    workdir: Path,
    shards: Path,
    uri: str,
    experiment: str,
    *overrides: str,
    env_extra: dict | None = None,
    out=None,
    err=None,
):
    """launcher/train.py on 2 CPU ranks started by torchrun (tests.helpers.train_on_ranks says
    why), tiny model."""
    args = [
        *TINY_TRAINING,
        *("--set", f"data.shards={shards}", "--set", f"output_dir={workdir / 'runs'}"),
        *("--set", f"tracking.uri={uri}", "--set", f"tracking.experiment={experiment}"),
        *(x for o in overrides for x in ("--set", o)),
    ]
    cmd = [*launcher_prefix("torchrun", 2, free_port()), str(REPO / "launcher" / "train.py"), *args]
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ.update({"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, cwd=workdir, env=environ, stdout=out or subprocess.PIPE, stderr=err or subprocess.PIPE, text=True
    )


def artifact_paths(client, run_id, folder=None):
    for f in client.list_artifacts(run_id, folder):
        yield from artifact_paths(client, run_id, f.path) if f.is_dir else [f.path]


def test_training_run_reads_back_from_the_server(env, tmp_path):
    root, server, shards = env
    server.ensure_running()
    proc = launch(
        tmp_path, shards["small"], server.url, "served", "name=served", "optim.epochs=1", "checkpoint.every_epochs=1"
    )
    stdout, stderr = proc.communicate(timeout=420)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert WARNING not in stdout + stderr
    run_dir = tmp_path / "runs" / "served"
    results = json.loads((run_dir / "results.json").read_text())

    client = MlflowClient(server.url)
    run = client.get_run(results["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "served"
    assert client.get_experiment(run.info.experiment_id).name == "served"
    assert run.data.params["objective.name"] == "base_indi_eff"
    assert run.data.params["data.shards"] == str(shards["small"]) and run.data.params["world_size"] == "2"
    assert run.data.tags["objective"] == "base_indi_eff"
    assert run.data.metrics["fine_recall_at_1"] == pytest.approx(results["metrics"]["fine_recall_at_1"])
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2]  # 32 images / (2 ranks x 8) = 2 steps, logged every step
    assert all(np.isfinite(m.value) and m.value > 0 for m in loss)
    # The instance CE at chance, from the train manifest's super-class sizes (base_indi_eff: a
    # row's softmax runs over its super-class's n images, CE ln n), and the epochs done per step.
    manifest = json.loads((shards["small"] / "train" / "manifest.json").read_text())
    sizes = [s["instance_end"] - s["instance_begin"] for s in manifest["super_classes"]]
    chance = sum(n * math.log(n) for n in sizes if n) / sum(sizes)
    assert float(run.data.params["instance_ce_chance"]) == pytest.approx(chance, rel=1e-12)
    epoch = client.get_metric_history(run.info.run_id, "epoch")
    assert [(m.step, m.value) for m in epoch] == [(1, 0.5), (2, 1.0)]

    paths = set(artifact_paths(client, run.info.run_id))
    assert {
        "config.json",
        "plan.json",
        "results.json",
        "results.md",
        "pictures/attention.png",
        "pictures/retrieval.png",
    } <= paths
    local = client.download_artifacts(run.info.run_id, "pictures/retrieval.png", str(tmp_path))
    assert Path(local).read_bytes() == (run_dir / "pictures" / "retrieval.png").read_bytes()
    with Image.open(local) as img:
        assert img.format == "PNG" and img.width > 500
    assert (
        json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text())["name"]
        == "served"
    )
    # Artifacts went through the server's proxy into its artifacts destination.
    assert list((root / "artifacts").glob(f"**/{run.info.run_id}/**/attention.png"))

    # The pictures command on the saved checkpoint (taken after the last epoch) draws the same
    # retrieval grid as the trainer did with the live model.
    from fgdist.report.pictures import main as pictures_main

    assert pictures_main(["--model", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    with Image.open(tmp_path / "cli" / "retrieval.png") as a, Image.open(run_dir / "pictures" / "retrieval.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_server_going_away_mid_run(env, tmp_path):
    root, server, shards = env
    server.ensure_running()
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    # MLflow's HTTP defaults (7 retries, exponential backoff) hold the first failed call and
    # MLflow's own end-of-process end_run for ~4 minutes each; no retries keeps the same path fast.
    fast_fail = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    proc = launch(
        tmp_path,
        shards["longer"],
        server.url,
        "gone",
        "name=gone",
        "optim.epochs=3",
        "checkpoint.every_epochs=0",
        env_extra=fast_fail,
        out=out,
        err=err,
    )
    try:
        client = MlflowClient(server.url)
        deadline = time.time() + 300
        while True:  # until the run has logged its first step metrics
            assert proc.poll() is None, "training ended before the server could be taken away"
            assert time.time() < deadline, "no metrics on the server after 300 s"
            exp = client.get_experiment_by_name("gone")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and "loss" in runs[0].data.metrics:
                break
            time.sleep(0.2)
        run_id = runs[0].info.run_id
        server.kill()
        assert proc.poll() is None  # 3 epochs x 8 steps: still training when the server went
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        err.close()
    output = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
    assert rc == 0, output[-4000:]
    assert output.count(WARNING) == 1, output[-4000:]
    assert "tracking is off for the rest of this run" in output
    assert "epoch 3/3 step 8/8" in output  # it trained on after the warning
    run_dir = tmp_path / "runs" / "gone"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["mlflow_run_id"] == run_id and "fine_recall_at_1" in results["metrics"]
    assert (run_dir / "results.md").is_file() and (run_dir / "pictures" / "retrieval.png").is_file()
