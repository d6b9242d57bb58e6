"""Shards read over HTTP (data.shards_url) from a real server on 127.0.0.1 (tests/shard_server.py):
the same streams as local shards, with the manifests local or fetched; a dropped connection
resumed without loss; a server that is gone, a missing shard and a stale manifest named; verify,
embed and pictures through the URL."""

import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fgdist.config import validate
from fgdist.data.loader import eval_batches, train_batches
from fgdist.data.partition import make_plan
from fgdist.data.remote import ShardReadError
from fgdist.data.shardset import open_split, reader_for
from fgdist.report.pictures import main as pictures_main
from fgdist.retrieval.embed import main as embed_main
from fgdist.training.model import EmbeddingNet
from shards.build import build_shards
from shards.cli import main as shards_main
from shards.sources.synthetic import open_synthetic
from tests.helpers import free_port, write_run_folder
from tests.shard_server import serving_thread

SMALL = dict(
    num_super=2, fine_per_super=2, train_per_fine=5, test_per_fine=3, image_size=16, big_patch=6, small_patch=3
)
SMALL_FILES = ("collection.json", "train/index.parquet", "train/manifest.json")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "syn"
    build_shards(open_synthetic(**SMALL), out, shard_size=3, progress=False)
    return out


def data_cfg(**data):
    return validate({"data": {"batch_size": 4, "shuffle_buffer": 5, "image_size": 16, **data}}, "t").data


def epoch(split, cfg, rank):
    batches = train_batches(split, make_plan(split.manifest, 2), cfg, rank, epoch=1, seed=5)
    return [(b["instance"].tolist(), b["images"]) for b in batches]


def assert_same_batches(a, b):
    assert [ids for ids, _ in a] == [ids for ids, _ in b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def samples(split, retry_seconds=5.0):
    urls = [split.shard_path(s) for s in split.manifest.shards]
    return [{k: v for k, v in s.items() if k != "__url__"} for s in reader_for(split, retry_seconds).samples(urls)]


def test_streams_over_http_equal_local_streams_with_the_manifests_local_or_fetched(shard_set, tmp_path):
    local_train, local_test = open_split(shard_set, "train"), open_split(shard_set, "test")
    with serving_thread(shard_set) as (url, server):
        with_local_manifest = open_split(shard_set, "train", url)
        fetched = open_split(tmp_path / "cache", "train", url)  # an empty folder: the small files come from the URL
        for name in SMALL_FILES:
            assert (tmp_path / "cache" / name).read_bytes() == (shard_set / name).read_bytes(), name
        assert fetched.manifest == local_train.manifest and fetched.url == f"{url}/train"
        cfg = data_cfg(num_workers=0)
        for split in (with_local_manifest, fetched):
            for rank in (0, 1):
                assert_same_batches(epoch(split, cfg, rank), epoch(local_train, cfg, rank))
        remote_test = open_split(tmp_path / "cache", "test", url)
        cfg = data_cfg(num_workers=1)  # read in a DataLoader worker process
        got = [(b["instance"].tolist(), b["images"]) for b in eval_batches(remote_test, cfg, 4, 0, 1)]
        want = [(b["instance"].tolist(), b["images"]) for b in eval_batches(local_test, cfg, 4, 0, 1)]
        assert_same_batches(got, want)
        tars = {path for path, _ in server.requests if path.endswith(".tar")}
    assert len(tars) == len(local_train.manifest.shards) + len(local_test.manifest.shards)
    assert not list((tmp_path / "cache").rglob(".*fetching"))  # no temporary file left


@pytest.mark.parametrize("ranges", [True, False], ids=["range-requests", "no-range-support"])
def test_a_dropped_connection_is_resumed_and_loses_nothing(shard_set, ranges):
    """The server cuts a shard's response in half once: the reader asks again from the byte it
    reached (or, from a server without Range support, passes over what it has) and delivers
    every sample once, unchanged."""
    dropped = "/train/train-000001.tar"
    with serving_thread(shard_set, drop_once={dropped}, ranges=ranges) as (url, server):
        got = samples(open_split(shard_set, "train", url))
    assert got == samples(open_split(shard_set, "train"))
    asked = [rng for path, rng in server.requests if path == dropped]
    size = (shard_set / "train" / "train-000001.tar").stat().st_size
    assert asked == [None, f"bytes={size // 2}-"]  # once whole, once from the byte it reached


def test_a_server_that_is_gone_is_an_error_naming_the_url(shard_set, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    split = open_split(shard_set, "train", url)
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=rf"{url}/train/train-000000.tar: .*Connection.*gave up after \d+ tries"):
        samples(split, retry_seconds=1.0)
    assert time.monotonic() - started < 5  # data.url_retry_seconds bounds the wait
    with pytest.raises(ShardReadError, match=rf"{url}/collection.json: .*url_retry_seconds=0"):
        open_split(tmp_path / "cache", "train", url, retry_seconds=0)
    assert not (tmp_path / "cache").exists()


def test_a_missing_shard_is_named_at_once_not_retried(shard_set, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shard_set, served)
    (served / "train" / "train-000002.tar").unlink()
    with serving_thread(served) as (url, server):
        split = open_split(shard_set, "train", url)
        with pytest.raises(ShardReadError, match=rf"{url}/train/train-000002.tar: HTTP 404"):
            samples(split, retry_seconds=30.0)
    assert [path for path, _ in server.requests].count("/train/train-000002.tar") == 1


def test_a_stale_manifest_is_named_and_verify_checks_a_url(shard_set, tmp_path, capsys):
    """The URL serves a rebuilt shard set (other pixels): streaming names the first shard whose
    checksum differs; `shards verify DIR --url URL` names every one before a run."""
    rebuilt = tmp_path / "rebuilt"
    build_shards(open_synthetic(**{**SMALL, "seed": 1}), rebuilt, shard_size=3, progress=False)
    with serving_thread(rebuilt) as (url, _):
        with pytest.raises(ShardReadError, match=rf"{url}/train/train-00000\d.tar: sha256 .* does not match the manif"):
            samples(open_split(shard_set, "train", url))
        assert shards_main(["verify", str(shard_set), "--url", url]) == 1
        out = capsys.readouterr().out
        shards = sum(len(open_split(shard_set, split).manifest.shards) for split in ("train", "test"))
        assert out.count("checksum does not match the manifest") == shards
        assert f"FAIL {url}/train/train-000000.tar: checksum" in out
        assert shards_main(["verify", str(rebuilt), "--url", url]) == 0
        assert capsys.readouterr().out.splitlines() == [f"ok   {url}/train", f"ok   {url}/test"]


def test_embed_and_pictures_read_remote_shards(shard_set, tmp_path):
    """fgdist-embed --shards-url and fgdist-pictures --shards-url give what the local shards give."""
    cfg = validate({"model": {"width": 8}, "data": {"shards": str(shard_set), "image_size": 16}}, "t")
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, 2, None)
    write_run_folder(tmp_path / "run", cfg, model)
    run = str(tmp_path / "run")
    with serving_thread(shard_set) as (url, _):
        for name, extra in (("local", []), ("remote", ["--shards-url", url])):
            shards = str(shard_set if name == "local" else tmp_path / "cache")
            argv = ["--model", run, "--shards", shards, "--split", "test", "--out", str(tmp_path / f"emb_{name}")]
            assert embed_main([*argv, *extra, "--quiet"]) == 0
            assert pictures_main(["--model", run, "--shards", shards, *extra, "--out", str(tmp_path / name)]) == 0
    local, remote = (pq.read_table(tmp_path / f"emb_{name}") for name in ("local", "remote"))
    assert remote.num_rows == 12 and remote.equals(local)
    for picture in ("attention.png", "retrieval.png"):
        pixels = [np.asarray(Image.open(tmp_path / name / picture)) for name in ("local", "remote")]
        assert np.array_equal(*pixels), picture
