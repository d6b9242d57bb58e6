"""A real HTTP server for shard sets in tests: Python's http.server, with Range requests (as
nginx and object stores answer them) and the faults the readers must survive or name.

In a thread (`serving_thread`), or as a process that can die mid-response:

    python -m tests.shard_server DIR PORT [--die-after N]

`--die-after N`: after N whole tar responses, the next one sends half its body and the process
exits, as a server that crashes mid-epoch does.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardHandler(SimpleHTTPRequestHandler):
    """GET with `Range: bytes=N-` support (206), and faults set on the server:
    `drop_once`: paths whose first response stops after half the body;
    `ranges`: False to ignore Range (answer 200 with the whole body, as a plain server does);
    `die_after`: whole tar responses before the process exits mid-response (None: never)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        path = Path(self.translate_path(self.path))
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        begin = self._range_start() if server.ranges else 0
        body = data[begin:]
        self.send_response(206 if begin else 200)
        if begin:
            self.send_header("Content-Range", f"bytes {begin}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
        self.end_headers()
        if self._cut_short(path):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if server.die_after is not None:
                os._exit(1)
            self.close_connection = True
            return
        self.wfile.write(body)

    def _range_start(self) -> int:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match else 0

    def _cut_short(self, path: Path) -> bool:
        server = self.server
        with server.lock:
            if self.path in server.drop_once:
                server.drop_once.discard(self.path)
                return True
            if server.die_after is not None and path.suffix == ".tar":
                server.tars_served += 1
                return server.tars_served > server.die_after
        return False

    def log_message(self, *args):
        if self.server.verbose:  # a server process logs to its log file; in a thread tests read `requests`
            super().log_message(*args)


def make_server(directory, port: int = 0, drop_once=(), ranges: bool = True, die_after=None):
    handler = functools.partial(ShardHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.lock, server.requests, server.tars_served = threading.Lock(), [], 0
    server.drop_once, server.ranges, server.die_after = set(drop_once), ranges, die_after
    server.verbose = False
    return server


@contextmanager
def serving_thread(directory, **faults):
    """(base URL, server) of a server on a free port of 127.0.0.1 for the block."""
    server = make_server(directory, **faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("port", type=int)
    parser.add_argument("--die-after", type=int)
    args = parser.parse_args()
    server = make_server(args.directory, args.port, die_after=args.die_after)
    server.verbose = True
    server.serve_forever()


if __name__ == "__main__":
    main()
