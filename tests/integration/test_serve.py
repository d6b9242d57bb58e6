"""fgdist-serve as a user meets it: a real server process on 127.0.0.1 over a small real catalogue
(an exported model, a `<super>/<fine>/` photo folder, its embeddings and a Flat index), asked
through HTTP and through its page in headless Chromium (the OS package, driven by Playwright)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from fgdist.config import RunConfig
from fgdist.embeddings_io import read_embeddings
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import embedder_from, export_model, load_model
from fgdist.retrieval.search import index_main, search_main
from fgdist.training.model import EmbeddingNet
from tests.helpers import REPO, free_port, wait_for_http

pytest.importorskip("faiss")
CHROMIUM = Path("/usr/bin/chromium")
CLASSES = {"tops": ("shirt", "coat"), "shoes": ("boot", "sandal"), "bags": ("tote",)}
PER_FINE, K_MAX, MAX_UPLOAD_MB = 3, 8, 0.25


def photo(gen, super_index: int, fine_index: int) -> Image.Image:
    """A 24-px picture: a background colour per super-class, a patch per fine class, some noise."""
    pixels = np.full((24, 24, 3), 60 + 60 * super_index, dtype=np.int16)
    pixels[4:14, 6 + 3 * fine_index : 16 + 3 * fine_index] = (200, 40 * fine_index, 90)
    pixels += gen.integers(-30, 30, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """An export of a random tiny model, a photo tree, its embeddings and a Flat index; and a
    query photo that is not in the index."""
    root = tmp_path_factory.mktemp("serve")
    cfg = RunConfig.model_validate(
        {"model": {"width": 4}, "data": {"image_size": 16, "shards": str(root)}, "output_dir": str(root)}
    )
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, len(CLASSES), None).eval()
    export_model(embedder_from(model, cfg.model, cfg.data, "backbone"), root / "model")
    gen = np.random.default_rng(0)
    for s, (super_name, fines) in enumerate(CLASSES.items()):
        for f, fine_name in enumerate(fines):
            (root / "photos" / super_name / fine_name).mkdir(parents=True)
            for i in range(PER_FINE):
                photo(gen, s, f).save(root / "photos" / super_name / fine_name / f"{i}.png")
    photo(gen, 1, 1).resize((40, 40)).save(root / "query.png")
    emb, index = root / "emb", root / "index"
    embed_args = ["--model", str(root / "model"), "--images", str(root / "photos"), "--out", str(emb), "--quiet"]
    assert embed_main(embed_args) == 0
    assert index_main(["--embeddings", str(emb), "--out", str(index)]) == 0
    return root


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kw)

    def search_file(self, path: Path, k: int) -> list[dict]:
        answer = self.post(f"/search?k={k}", files={"image": (path.name, path.read_bytes())})
        assert answer.status_code == 200, answer.text
        return answer.json()["neighbours"]


@pytest.fixture(scope="module")
def server(catalogue):
    """`fgdist-serve` on a free port, with the model the index records (no --model)."""
    port, log = free_port(), catalogue / "serve.log"
    cmd = [sys.executable, "-m", "fgdist.retrieval.serve", "--index", str(catalogue / "index"), "--port", str(port)]
    cmd += ["--k-max", str(K_MAX), "--max-upload-mb", str(MAX_UPLOAD_MB)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=catalogue, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", proc, log)
        yield Server(url, proc, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def printed_neighbours(index: Path, image: Path, k: int, capsys) -> list[dict]:
    """fgdist-search --image's table, one dict per row (its header names the fields; scores .4f)."""
    capsys.readouterr()
    assert search_main(["--index", str(index), "--image", str(image), "--k", str(k)]) == 0
    header, *rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    return [dict(zip(header, row)) for row in rows[:k]]


def exact_neighbours(catalogue: Path, image: Path, k: int) -> tuple[list[str], np.ndarray]:
    """(keys, scores) of the k nearest embeddings by brute force: the query embedded by the model
    the index was built with, against every catalogue embedding."""
    emb, embedder = read_embeddings(catalogue / "emb"), load_model(catalogue / "model")
    with Image.open(image) as img:
        query = embedder(embedder.preprocess([img]))[0]
    scores = emb.vectors @ query
    best = scores.topk(k)
    return [emb.keys[i] for i in best.indices], best.values.detach().numpy()


def test_health_describes_the_index(server, catalogue):
    health = server.get("/health").json()
    count = sum(len(fines) for fines in CLASSES.values()) * PER_FINE
    assert health["status"] == "ok" and health["count"] == count and health["dim"] == 32
    assert health["k_max"] == K_MAX and Path(health["index"]) == (catalogue / "index").resolve()


@pytest.mark.parametrize("query", ["query.png", "photos/shoes/sandal/1.png"])
def test_the_api_answers_what_fgdist_search_prints(server, catalogue, query, capsys):
    image, k = catalogue / query, 5
    served = server.search_file(image, k)
    assert [n["rank"] for n in served] == list(range(1, k + 1))
    printed = printed_neighbours(catalogue / "index", image, k, capsys)
    for n, row in zip(served, printed, strict=True):
        assert set(n) == {"rank", "key", "score", "super", "fine", "super_name", "fine_name", "path"}
        assert {f: str(v) for f, v in n.items() if f != "score"} == {f: v for f, v in row.items() if f != "score"}
        assert abs(n["score"] - float(row["score"])) <= 5e-5  # printed with 4 decimals
        super_name, fine_name, _ = n["key"].split("/")  # a fine class is named within its super-class
        assert (n["super_name"], n["fine_name"], n["path"]) == (super_name, f"{super_name}/{fine_name}", n["key"])
    keys, scores = exact_neighbours(catalogue, image, k)
    assert [n["key"] for n in served] == keys
    assert np.allclose([n["score"] for n in served], scores, atol=1e-5)


def test_a_search_from_an_index_image_is_the_search_with_its_file(server, catalogue):
    key = "tops/coat/2.png"
    from_key = server.get(f"/search?k=4&key={quote(key)}").json()["neighbours"]
    from_file = server.search_file(catalogue / "photos" / key, 4)
    assert [n["key"] for n in from_key] == [n["key"] for n in from_file] and from_key[0]["key"] == key
    assert np.allclose([n["score"] for n in from_key], [n["score"] for n in from_file], atol=1e-5)
    image = server.get(f"/image?key={quote(key)}")
    assert image.headers["content-type"] == "image/png"
    assert image.content == (catalogue / "photos" / key).read_bytes()


def png_bytes(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "no image field": ("post", "/search?k=3", {"files": {"picture": ("a.png", png_bytes(20))}}, 400, "'image'"),
    "not an image": ("post", "/search?k=3", {"files": {"image": ("notes.txt", b"hello")}}, 400, "notes.txt"),
    "truncated image": ("post", "/search", {"files": {"image": ("cut.png", png_bytes(64)[:60])}}, 400, "cut.png"),
    "not a form": ("post", "/search?k=3", {"json": {"image": "x"}}, 400, "'image'"),
    "k is 0": ("post", "/search?k=0", {"files": {"image": ("a.png", png_bytes(20))}}, 400, "k must be"),
    "k over --k-max": ("get", f"/search?k={K_MAX + 1}&key=x", {}, 400, f"1..{K_MAX}"),
    "k not an integer": ("get", "/search?k=ten&key=x", {}, 400, "'ten'"),
    "unknown key": ("get", "/search?key=no/such.png", {}, 404, "no/such.png"),
    "unknown image": ("get", "/image?key=no/such.png", {}, 404, "no/such.png"),
    "no key": ("get", "/image", {}, 400, "'key'"),
    "wrong method": ("delete", "/search", {}, 405, "DELETE"),
    "unknown path": ("get", "/index.php", {}, 404, "/index.php"),
    "over --max-upload-mb": ("post", "/search", {"files": {"image": ("big.png", os.urandom(300_000))}}, 413, "limit"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_one_message_and_the_server_goes_on(server, case):
    method, path, kw, status, words = BAD_REQUESTS[case]
    answer = getattr(requests, method)(server.url + path, timeout=30, **kw)
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error"] and words in answer.json()["error"], answer.text
    assert server.get("/health").status_code == 200
    assert server.proc.poll() is None


def test_each_request_is_logged_with_its_latency(server):
    server.get("/health?probe=logged")
    deadline = time.monotonic() + 10
    while "GET /health?probe=logged 200" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in server.log.read_text().splitlines() if "GET /health?probe=logged 200" in x)
    assert line.endswith(" ms")


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_the_page_in_headless_chromium(server, catalogue, tmp_path):
    """Choose a file, see k tiles with names, click one and get its neighbours; a dropped file
    searches too; a file that is not an image shows the server's message."""
    from playwright.sync_api import expect, sync_playwright

    k = 4
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url)
            expect(page.locator("#info")).to_contain_text("15 images")
            page.fill("#k", str(k))
            page.set_input_files("#file", str(catalogue / "query.png"))
            tiles = page.locator(".tile")
            expect(tiles).to_have_count(k)
            expected = server.search_file(catalogue / "query.png", k)
            assert [tiles.nth(i).get_attribute("data-key") for i in range(k)] == [n["key"] for n in expected]
            super_name, fine_name, _ = expected[0]["key"].split("/")
            expect(tiles.first.locator(".names")).to_have_text(f"{super_name} / {fine_name}")
            expect(tiles.first.locator(".score")).to_have_text(f"{expected[0]['score']:.3f}")

            clicked = expected[2]["key"]
            tiles.nth(2).click()
            expect(page.locator("#query-img")).to_have_attribute("src", f"/image?key={quote(clicked, safe='')}")
            expect(tiles.first).to_have_attribute("data-key", clicked)
            after = server.get(f"/search?k={k}&key={quote(clicked)}").json()["neighbours"]
            assert [tiles.nth(i).get_attribute("data-key") for i in range(k)] == [n["key"] for n in after]
            page.wait_for_function(
                "[...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth)"
            )
            page.screenshot(path=str(tmp_path / "page.png"))

            dropped = drop_file(page, catalogue / "photos/bags/tote/0.png")
            expect(page.locator("#query-caption")).to_have_text(dropped)
            expect(tiles.first).to_have_attribute("data-key", "bags/tote/0.png")

            page.set_input_files("#file", {"name": "notes.txt", "mimeType": "image/png", "buffer": b"hello"})
            expect(page.locator("#status.error")).to_contain_text("notes.txt: not an image")
        finally:
            browser.close()


def drop_file(page, path: Path) -> str:
    """Drop `path` onto the page's drop zone as a browser does (a DataTransfer holding the file)."""
    name = "dropped-" + path.name
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            return transfer;
        }""",
        [name, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    return name


def test_concurrent_queries_each_get_their_own_neighbours(server, catalogue):
    """Queries searched in one batch are answered as if alone, each with its own k."""
    from concurrent.futures import ThreadPoolExecutor

    images = sorted((catalogue / "photos").rglob("*.png"))
    jobs = [(image, 1 + i % K_MAX) for i, image in enumerate(images)]
    alone = [server.search_file(image, k) for image, k in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: server.search_file(*job), jobs * 2))
    for want, got in zip(alone * 2, together):
        assert [n["key"] for n in got] == [n["key"] for n in want]
        assert np.allclose([n["score"] for n in got], [n["score"] for n in want], atol=1e-5)
    health = server.get("/health").json()
    assert health["queries"] >= len(jobs) * 3 and 1 <= health["batches"] <= health["queries"]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--index", "no/such/index"], "no/such/index"),
        (["--device", "warp9"], "--device warp9"),
        (["--model", "no/such/model"], "no/such/model"),
    ],
)
def test_a_server_that_cannot_start_says_why(catalogue, flags, words, capsys):
    from fgdist.retrieval.serve import main

    args = ["--index", str(catalogue / "index"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_a_model_of_another_dimension_is_refused(catalogue, tmp_path, capsys):
    from fgdist.retrieval.serve import main

    cfg = RunConfig.model_validate({"model": {"width": 8}, "data": {"image_size": 16, "shards": str(tmp_path)}})
    export_model(embedder_from(EmbeddingNet(cfg.model, 2, None), cfg.model, cfg.data, "backbone"), tmp_path / "m")
    assert main(["--index", str(catalogue / "index"), "--model", str(tmp_path / "m")]) == 2
    assert "DimensionMismatchError" in capsys.readouterr().err
