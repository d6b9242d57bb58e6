"""Visual search over HTTP, with a web page to look at neighbours (`pip install fgdist[search]`).

    fgdist-serve --index index/photos [--model exported/m] [--host 127.0.0.1] [--port 8000]

The model (`fgdist.load_model`) and the index (`fgdist.retrieval.search.open_index`) are loaded once; then

    GET  /health               200 {"status": "ok", "count", "dim", "type", "model", "index", "k_max",
                               "batches", "queries": searched so far}
    POST /search?k=K           a multipart form with the image file in the field `image`
    GET  /search?key=KEY&k=K   search from an image of the index (what a click on the page asks)
        both answer {"neighbours": [{"rank", "key", "score", "super", "fine", "super_name",
        "fine_name", "path"}, ...]}: Index.neighbours, best first, the same as fgdist-search
    GET  /image?key=KEY        an index image's file, with its content type (the page's thumbnails)
    GET  /                     the page: choose or drop an image, see the top-k neighbours' thumbnails
                               with names and scores, click one to search from it

    curl -F image=@Q.jpg 'http://127.0.0.1:8000/search?k=10'

A bad request gets a 4xx and one JSON message {"error": "..."}: 400 for no `image` field, a file
that is not an image, a k that is not an integer in 1..--k-max, a missing key; 404 for an unknown
key or path; 405 for a wrong method; 411/413 for an upload without a length or over
--max-upload-mb. The server goes on serving; each request is logged with its status and latency.

Why Starlette on uvicorn: both come with MLflow (no new server to install; Starlette's multipart
parser adds python-multipart only), uvicorn is a mature HTTP/1.1 server (keep-alive, graceful
shutdown on SIGTERM, h11 framing), and one asyncio event loop holds any number of waiting clients
for free. The work of a query is CPU-bound: decoding and preprocessing run on Starlette's thread
pool, and embedding + index search go through one `Batcher` worker thread that takes every query
waiting at that moment (up to --max-batch) and runs ONE forward pass and ONE index search for all
of them. torch and faiss already spread one call over all cores, so running queries in parallel
threads would only oversubscribe the cores; a batch shares the per-call overheads instead, so
throughput grows with concurrency while a lone query is not delayed (no waiting window).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from fgdist import cli
from fgdist.images import open_image
from fgdist.search_errors import ERRORS, DimensionMismatchError

log = logging.getLogger("fgdist.retrieval.serve")
DEFAULT_K = 10


@dataclass(frozen=True)
class Limits:
    k_max: int = 100
    max_upload_bytes: int = 20 * 2**20
    max_batch: int = 32


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- the work of one query --------------------------------------------------------------------
def decode_image(data: bytes, name: str) -> Image.Image:
    """The uploaded (or index) file as a PIL image; 400 naming it when it does not decode."""
    try:
        return open_image(data)
    except Image.UnidentifiedImageError:
        raise RequestError(400, f"{name}: not an image (no image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, corrupt, huge
        raise RequestError(400, f"{name}: not an image ({type(err).__name__}: {err})") from None


def image_tensor(embedder, data: bytes, name: str) -> torch.Tensor:
    """The model's input for one image file: its evaluation preprocessing (3 x S x S)."""
    try:
        return embedder.preprocess([decode_image(data, name)])[0]
    except ValueError as err:  # an image the preprocessing refuses (too small, too elongated)
        raise RequestError(400, f"{name}: {err}") from None


def content_type(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format, "application/octet-stream")
    except (OSError, SyntaxError, ValueError):
        return "application/octet-stream"


class Batcher:
    """Queries waiting together are embedded and searched together, on one worker thread: one
    forward pass and one Index.neighbours call per batch, each query cut to its own k."""

    def __init__(self, embedder, index, max_batch: int):
        self.embedder, self.index, self.max_batch = embedder, index, max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fgdist-search")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = self.queries = 0  # searched so far (their ratio: the mean batch, in /health)

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def neighbours(self, image: torch.Tensor, k: int) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, k, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            waiting = [item for item in batch if not item[2].done()]  # a client gone is skipped
            if not waiting:
                continue
            self.batches, self.queries = self.batches + 1, self.queries + len(waiting)
            try:
                results = await loop.run_in_executor(self.executor, self._search, waiting)
            except Exception as err:  # every waiting client learns it, and the loop goes on
                for *_, future in waiting:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future), result in zip(waiting, results):
                if not future.done():
                    future.set_result(result)

    def _search(self, batch: list) -> list[list[dict]]:
        images = torch.stack([image for image, _, _ in batch])
        with torch.inference_mode():
            vectors = self.embedder(images).float().cpu().numpy()
        found = self.index.neighbours(vectors, max(k for _, k, _ in batch))
        return [rows[:k] for (_, k, _), rows in zip(batch, found)]


# -- HTTP ---------------------------------------------------------------------------------------
def parse_k(params, k_max: int) -> int:
    raw = params.get("k", str(min(DEFAULT_K, k_max)))
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= k_max:
        raise RequestError(400, f"k must be an integer in 1..{k_max}, got {raw!r}")
    return k


def required_key(params) -> str:
    key = params.get("key")
    if not key:
        raise RequestError(400, "missing query parameter 'key': the key of an index image, as in the neighbours")
    return key


def index_image(index, key: str) -> bytes:
    try:
        return index.image_bytes(key)
    except KeyError:
        raise RequestError(404, f"no image with key {key!r} in the index") from None
    except (FileNotFoundError, ValueError) as err:  # its file is gone, or the index records no image source
        raise RequestError(404, f"the image of key {key!r} cannot be read: {err}") from None


async def read_upload(request, limits: Limits) -> tuple[bytes, str]:
    """The bytes and file name of the form field `image`; the upload's size is checked first."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise RequestError(411, "POST /search needs a Content-Length (send the image as a multipart form)")
    if int(length) > limits.max_upload_bytes:
        raise RequestError(
            413, f"upload of {int(length):,} bytes is over the limit of {limits.max_upload_bytes:,} (--max-upload-mb)"
        )
    form = await request.form(max_files=1, max_fields=20)
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            fields = ", ".join(sorted(form.keys())) or "none"
            raise RequestError(400, f"no file in the multipart form field 'image' (fields sent: {fields})")
        return await upload.read(), upload.filename or "the uploaded file"
    finally:
        await form.close()


class AccessLog:
    """ASGI middleware: one log line per request with its status and latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + (f"?{query}" if query else "")
            log.info("%s %s %d %.1f ms", scope["method"], target, status[0], 1000 * (time.perf_counter() - started))


def create_app(embedder, index, limits: Limits, description: dict):
    """The Starlette application; `description` is added to /health (model, index folder)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page = resources.files("fgdist.retrieval").joinpath("static/index.html").read_text(encoding="utf-8")
    batcher = Batcher(embedder, index, limits.max_batch)
    health_body = {
        "status": "ok",
        "count": int(index.index.ntotal),
        "dim": int(index.dim),
        "type": index.meta.get("type"),
    }
    health_body.update(description, k_max=limits.k_max)

    async def search_image(data: bytes, name: str, k: int):
        tensor = await run_in_threadpool(image_tensor, embedder, data, name)
        return JSONResponse({"neighbours": await batcher.neighbours(tensor, k)})

    async def search(request):
        k = parse_k(request.query_params, limits.k_max)
        if request.method == "POST":
            return await search_image(*await read_upload(request, limits), k)
        key = required_key(request.query_params)
        return await search_image(await run_in_threadpool(index_image, index, key), f"index image {key!r}", k)

    async def image(request):
        data = await run_in_threadpool(index_image, index, required_key(request.query_params))
        return Response(data, media_type=content_type(data), headers={"Cache-Control": "max-age=3600"})

    async def health(request):
        return JSONResponse({**health_body, "batches": batcher.batches, "queries": batcher.queries})

    async def home(request):
        return HTMLResponse(page)

    async def request_error(request, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    async def http_error(request, err: HTTPException):  # Starlette's own: unknown path, wrong method, bad form
        message = {404: f"no such path {request.url.path}", 405: f"{request.method} not allowed on {request.url.path}"}
        body = {"error": message.get(err.status_code, err.detail)}
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    async def internal_error(request, err: Exception):
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    return Starlette(
        routes=[
            Route("/", home, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/search", search, methods=["GET", "POST"]),
            Route("/image", image, methods=["GET"]),
        ],
        middleware=[Middleware(AccessLog)],
        exception_handlers={RequestError: request_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


# -- command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser("fgdist-serve", __doc__)
    p.add_argument("--index", required=True, help="an fgdist-index folder")
    p.add_argument("--model", help="the model that embeds the queries (default: the one the index was built with)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="auto", help="where the model runs: auto (a GPU if there is one), cpu, cuda:1")
    p.add_argument("--k-max", type=int, default=Limits.k_max, help="the largest k a request may ask for")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=Limits.max_upload_bytes / 2**20,
        help="uploads over this size are refused (413)",
    )
    p.add_argument(
        "--max-batch", type=int, default=Limits.max_batch, help="queries embedded and searched together at most"
    )
    args = p.parse_args(argv)
    for flag in ("k_max", "max_batch", "max_upload_mb"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return args


def load(args):
    """(embedder on its device, index, /health description); named errors for a bad index, model
    or device, and for a model whose embeddings do not match the index's dimension."""
    from fgdist.retrieval.export import load_model
    from fgdist.retrieval.search import open_index

    index = open_index(args.index)
    source = args.model or index.model_source
    if not source:
        raise ValueError(f"{args.index}: the index records no model; pass --model")
    embedder = load_model(source)
    if embedder.dim != index.dim:
        raise DimensionMismatchError(
            f"model {source} embeds {embedder.dim}-dim vectors, the index {args.index} holds {index.dim}-dim ones"
        )
    device = cli.torch_device(args.device)
    embedder = embedder.to(device)
    return embedder, index, {"model": str(source), "index": str(Path(args.index).resolve()), "device": str(device)}


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fgdist-serve %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    return cli.run_reporting(lambda: _serve(args), ERRORS + (FileNotFoundError, ValueError, LookupError, ImportError))


def _serve(args) -> int:
    import uvicorn

    embedder, index, description = load(args)
    limits = Limits(args.k_max, int(args.max_upload_mb * 2**20), args.max_batch)
    app = create_app(embedder, index, limits, description)
    log.info(
        "%s x %s index %s, model %s on %s: http://%s:%d/",
        f"{index.index.ntotal:,}",
        index.dim,
        description["index"],
        description["model"],
        args.device,
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
