"""bench/device_check.sh --dry-run: the prepared GPU check runs end to end on the CPU at tiny
shapes and leaves its summary (at most the 8 files a device machine sends back)."""

import json
import os
import subprocess

from tests.helpers import REPO


def test_device_check_dry_run_writes_its_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + (out / "logs.txt").read_text()[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        [
            *("device_check.json", "device_check.md", "kernel.json", "kernel.md", "logs.txt"),
            *("train_results.json", "backbones.md"),
        ]
    )
    summary = json.loads((out / "device_check.json").read_text())
    assert summary["dry_run"] and [s["step"] for s in summary["steps"]] == [
        "kernel_tests",
        "kernel_bench",
        "shards",
        "train",
        "backbones",
    ]
    assert all(s["rc"] == 0 for s in summary["steps"])
    assert summary["kernel_tests"]["tests"] >= 2 and summary["kernel_tests"]["failures"] == 0
    measured = [c for c in summary["kernel"]["cases"] if "skipped" not in c]
    assert {c["impl"] for c in measured} == {"torch_reference", "masked_dense", "torch_linear_ce"}
    assert all(c["fwd_tflops"] > 0 and c["bwd_tflops"] > 0 for c in measured)
    train = summary["training"]
    assert train["pictures"] == ["attention.png", "retrieval.png"]
    assert train["results"]["eval_images"] == 16 and "fine_recall_at_1" in train["results"]
    assert train["syncs_per_step"] is None  # counted on CUDA only
    assert "| kernel_tests | 0 |" in (out / "device_check.md").read_text()
    # the backbones' step times: a channels-last ResNet and a timm ViT, each a row of the table
    rows = [line for line in summary["backbones"].splitlines() if line.startswith(("| resnet18_w8_cl", "| vit_tiny"))]
    assert len(rows) == 2 and "channels-last inputs" in summary["backbones"]
