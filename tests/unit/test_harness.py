"""fgdist.harness, shared by the launcher, the tests and bench/: a free port, and waiting for a
real local HTTP server (python -m http.server) until it answers or is known dead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fgdist.harness import ServerNotReadyError, free_port, manifest_with_sizes, wait_for_http


def test_waits_until_a_real_server_answers(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, log, timeout_s=60)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_server_that_exits_is_named_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("address already in use")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)
    with pytest.raises(ServerNotReadyError, match="exited 3:\naddress already in use"):
        wait_for_http(f"http://127.0.0.1:{free_port()}/", proc, log, timeout_s=60)


def test_manifest_with_sizes_lays_super_classes_end_to_end():
    m = manifest_with_sizes([3, 1, 2], num_fine=4)
    assert [(s.instance_begin, s.instance_end) for s in m.super_classes] == [(0, 3), (3, 4), (4, 6)]
    assert m.num_instances == 6 and m.fine_to_super == [0, 1, 2, 0]
